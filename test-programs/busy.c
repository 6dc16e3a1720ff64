// Deterministic busy work for lifecycle tests: mixes a counter N times, prints the task's
// arguments and the checksum. Args: ITERATIONS [TAG...].
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000000;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (unsigned long i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    printf("busy");
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf(" -> %016llx\n", (unsigned long long)x);
    return 0;
}
