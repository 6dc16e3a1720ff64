// Reads the clocks and the random source: deterministic for a given seed.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    struct timespec rt, mono;
    clock_gettime(CLOCK_REALTIME, &rt);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    printf("realtime %lld.%09ld monotonic %lld.%09ld\n", (long long)rt.tv_sec, rt.tv_nsec,
           (long long)mono.tv_sec, mono.tv_nsec);
    unsigned char buf[16];
    if (getentropy(buf, sizeof buf) != 0) return 1;
    printf("random ");
    for (unsigned i = 0; i < sizeof buf; i++) printf("%02x", buf[i]);
    printf("\n");
    return 0;
}
