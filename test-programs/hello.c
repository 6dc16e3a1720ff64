// A well-behaved task: greets its arguments, then copies stdin to stdout, upper-cased.
#include <ctype.h>
#include <stdio.h>

int main(int argc, char **argv) {
    printf("hello from %s with %d args:", argv[0], argc - 1);
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    int c;
    while ((c = getchar()) != EOF) putchar(toupper(c));
    return 0;
}
