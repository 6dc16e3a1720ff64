// Tries every way out of the sandbox and reports what happened; each attempt must fail.
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    FILE *f = fopen("/etc/passwd", "r");
    printf("fopen /etc/passwd: %s\n", f ? "OPENED" : "denied");
    int fd = open("secret.txt", O_CREAT | O_WRONLY, 0644);
    printf("open secret.txt for writing: %s\n", fd >= 0 ? "OPENED" : "denied");
    DIR *d = opendir(".");
    printf("opendir .: %s\n", d ? "OPENED" : "denied");
    const char *home = getenv("HOME");
    const char *path = getenv("PATH");
    printf("getenv HOME/PATH: %s\n", (home || path) ? "LEAKED" : "empty");
    char buf[16];
    ssize_t r = recv(3, buf, sizeof buf, 0);
    printf("recv on fd 3: %s\n", r >= 0 ? "RECEIVED" : "denied");
    ssize_t s = send(4, "x", 1, 0);
    printf("send on fd 4: %s\n", s >= 0 ? "SENT" : "denied");
    ssize_t w = write(7, "x", 1);
    printf("write fd 7: %s\n", w >= 0 ? "WRITTEN" : "denied");
    return 0;
}
