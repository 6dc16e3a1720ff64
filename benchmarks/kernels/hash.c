// FNV-1a and xorshift mixing over a buffer, repeated: integer and bit operations. Args: BYTES R.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1 << 20;
    int reps = argc > 2 ? atoi(argv[2]) : 40;
    uint8_t *buf = malloc(n);
    uint64_t x = 88172645463325252ull;
    for (long i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        buf[i] = (uint8_t)x;
    }
    uint64_t h = 1469598103934665603ull;
    for (int r = 0; r < reps; r++) {
        for (long i = 0; i < n; i++) {
            h ^= buf[i];
            h *= 1099511628211ull;
        }
        buf[r % n] ^= (uint8_t)h;
    }
    printf("hash bytes=%ld reps=%d h=%016llx\n", n, reps, (unsigned long long)h);
    return 0;
}
