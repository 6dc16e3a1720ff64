// Exits with code 3 after writing a line: outcome exit_nonzero, exit_code 3.
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    printf("about to fail\n");
    fflush(stdout);
    exit(3);
}
