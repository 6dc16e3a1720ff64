// Unbounded recursion: trap (stack_overflow).
#include <stdio.h>

__attribute__((noinline)) static unsigned long long down(volatile unsigned long long n) {
    volatile char pad[256];
    pad[n & 255] = (char)n;
    return down(n + 1) + pad[(n + 1) & 255];
}

int main(void) {
    printf("%llu\n", down(0));
    return 0;
}
