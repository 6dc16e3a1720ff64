// Writes without end: output_too_large under the output cap.
#include <stdio.h>

int main(void) {
    for (unsigned long i = 0;; i++) printf("line %lu of a flood that never ends\n", i);
}
