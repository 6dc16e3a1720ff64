// Allocates and touches 1 MiB blocks forever: out_of_memory under the memory cap.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *volatile keep;  // stores through a volatile pointer keep the allocations observable

int main(void) {
    for (unsigned long total = 0;; total++) {
        char *p = malloc(1 << 20);
        if (!p) {  // never reached: the metered grow check ends the run first
            printf("malloc failed after %lu MiB\n", total);
            return 42;
        }
        memset(p, 1, 1 << 20);
        keep = p;
    }
}
