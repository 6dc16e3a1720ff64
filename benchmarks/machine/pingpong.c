/* What waking a thread costs on this machine, on the same core and across cores.
 *
 * Two threads pass one byte back and forth through two pipes, 20,000 times: each round
 * trip wakes each thread once. The main thread is pinned to core 0, the other to the core
 * given. docs/benchmarks.md (session 10) explains why this matters to a domain.
 *
 *   cc -O2 -pthread benchmarks/machine/pingpong.c -o /tmp/pingpong
 *   /tmp/pingpong 0     # both threads on core 0
 *   /tmp/pingpong 1     # core 0 and core 1
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 20000, RUNS = 3 };

static int there[2], back[2];
static int other_core;

static int pin(int core) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *echo(void *unused) {
    (void)unused;
    if (pin(other_core) != 0) {
        fprintf(stderr, "cannot pin to core %d\n", other_core);
        exit(1);
    }
    char c;
    while (read(there[0], &c, 1) == 1) {
        if (write(back[1], &c, 1) != 1) break;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORE (the second thread's core; the first is on 0)\n", argv[0]);
        return 2;
    }
    other_core = atoi(argv[1]);
    if (pin(0) != 0 || pipe(there) != 0 || pipe(back) != 0) {
        perror("setup");
        return 1;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, echo, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    for (int run = 0; run < RUNS; run++) {
        struct timespec a, b;
        char c = 1;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < ROUNDS; i++) {
            if (write(there[1], &c, 1) != 1 || read(back[0], &c, 1) != 1) {
                perror("ping");
                return 1;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
        printf("core 0 <-> core %d: %.1f us a round trip (two wake-ups)\n", other_core,
               ns / ROUNDS / 1e3);
    }
    return 0;
}
