// Sieve of Eratosthenes up to N, repeated R times. Args: N R.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000000;
    int reps = argc > 2 ? atoi(argv[2]) : 10;
    unsigned char *composite = malloc(n + 1);
    long count = 0;
    for (int r = 0; r < reps; r++) {
        memset(composite, 0, n + 1);
        count = 0;
        for (long long i = 2; i <= n; i++) {
            if (composite[i]) continue;
            count++;
            for (long long j = i * i; j <= n; j += i) composite[j] = 1;
        }
    }
    printf("sieve n=%d primes=%ld\n", n, count);
    return 0;
}
