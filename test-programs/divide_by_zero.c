// Integer division by zero: trap (integer_division_by_zero).
#include <stdio.h>

int main(void) {
    volatile int zero = 0;
    printf("%d\n", 10 / zero);
    return 0;
}
