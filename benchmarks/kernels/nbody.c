// N-body simulation (the Computer Language Benchmarks Game's planets), STEPS steps. Args: STEPS.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define N 5
static double x[N][3], v[N][3], m[N];

static void init(void) {
    const double pi = 3.141592653589793, days = 365.24, sm = 4 * pi * pi;
    double p[N][7] = {
        {0, 0, 0, 0, 0, 0, 1},
        {4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01,
         1.66007664274403694e-03, 7.69901118419740425e-03, -6.90460016972063023e-05, 9.54791938424326609e-04},
        {8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01,
         -2.76742510726862411e-03, 4.99852801234917238e-03, 2.30417297573763929e-05, 2.85885980666130812e-04},
        {1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01,
         2.96460137564761618e-03, 2.37847173959480950e-03, -2.96589568540237556e-05, 4.36624404335156298e-05},
        {1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01,
         2.68067772490389322e-03, 1.62824170038242295e-03, -9.51592254519715870e-05, 5.15138902046611451e-05}};
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < 3; k++) { x[i][k] = p[i][k]; v[i][k] = p[i][3 + k] * days; }
        m[i] = p[i][6] * sm;
    }
}

static double energy(void) {
    double e = 0;
    for (int i = 0; i < N; i++) {
        e += 0.5 * m[i] * (v[i][0] * v[i][0] + v[i][1] * v[i][1] + v[i][2] * v[i][2]);
        for (int j = i + 1; j < N; j++) {
            double dx = x[i][0] - x[j][0], dy = x[i][1] - x[j][1], dz = x[i][2] - x[j][2];
            e -= m[i] * m[j] / sqrt(dx * dx + dy * dy + dz * dz);
        }
    }
    return e;
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? atol(argv[1]) : 1000000;
    init();
    const double dt = 0.01;
    for (long s = 0; s < steps; s++) {
        for (int i = 0; i < N; i++)
            for (int j = i + 1; j < N; j++) {
                double dx = x[i][0] - x[j][0], dy = x[i][1] - x[j][1], dz = x[i][2] - x[j][2];
                double d2 = dx * dx + dy * dy + dz * dz;
                double mag = dt / (d2 * sqrt(d2));
                v[i][0] -= dx * m[j] * mag; v[i][1] -= dy * m[j] * mag; v[i][2] -= dz * m[j] * mag;
                v[j][0] += dx * m[i] * mag; v[j][1] += dy * m[i] * mag; v[j][2] += dz * m[i] * mag;
            }
        for (int i = 0; i < N; i++)
            for (int k = 0; k < 3; k++) x[i][k] += dt * v[i][k];
    }
    printf("nbody steps=%ld energy=%.9f\n", steps, energy());
    return 0;
}
