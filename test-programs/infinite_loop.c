// Spins forever: out_of_fuel under a fuel limit, deadline_exceeded under a short deadline.
int main(void) {
    volatile unsigned long long n = 0;
    for (;;) n++;
}
