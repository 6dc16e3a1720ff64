/*
 * A small multilayer perceptron trained by stochastic gradient descent on the UCI optical
 * handwritten digits (8x8 images, 10 classes), for Stardust's hyperparameter-search example.
 *
 *   train LR HIDDEN L2 EPOCHS SEED < digits.csv
 *
 * stdin:  the dataset as CSV, one image per line: 64 pixel values (0..16), then the label.
 * args:   learning rate (> 0), hidden units (1..256), L2 penalty (>= 0), epochs (1..200),
 *         seed (integer: weight initialisation and the order of examples).
 * stdout: one JSON object with the validation accuracy and loss (and the training ones).
 *
 * Split (fixed): example i (0-based line number) is validation when i % 5 == 0 (360
 * images), training otherwise (1,437). Network: 64 inputs scaled to [0, 1] -> HIDDEN ReLU
 * units -> 10 softmax outputs; He-uniform initialisation; one example per step, the
 * training set shuffled each epoch (Fisher-Yates with SplitMix64). Deterministic: the same
 * arguments and data give the same bits on every engine.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_N 2000
#define D 64
#define K 10
#define MAX_H 256

static double X[MAX_N][D];
static int Y[MAX_N];
static int train_idx[MAX_N], val_idx[MAX_N];
static double W1[MAX_H][D], B1[MAX_H], W2[K][MAX_H], B2[K];
static double h[MAX_H], dh[MAX_H], p[K];

static uint64_t rng_state;
static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double uniform(void) { return (double)(next_u64() >> 11) * (1.0 / 9007199254740992.0); }

static int read_data(void) {
    int n = 0, col = 0, c, value = 0, have = 0;
    while ((c = getchar()) != EOF) {
        if (c >= '0' && c <= '9') {
            value = value * 10 + (c - '0');
            have = 1;
            if (value > 1000) return -1;
        } else if (c == ',' || c == '\n') {
            if (!have) {
                if (c == '\n' && col == 0) continue; /* blank line */
                return -1;
            }
            if (n >= MAX_N) return -1;
            if (col < D) {
                if (value > 16) return -1;
                X[n][col] = value / 16.0;
            } else if (col == D) {
                if (value > 9) return -1;
                Y[n] = value;
            } else {
                return -1;
            }
            col++;
            value = 0;
            have = 0;
            if (c == '\n') {
                if (col != D + 1) return -1;
                n++;
                col = 0;
            }
        } else if (c != '\r' && c != ' ') {
            return -1;
        }
    }
    if (have || col != 0) { /* last line without a newline */
        if (col != D || !have || value > 9 || n >= MAX_N) return -1;
        Y[n++] = value;
    }
    return n;
}

/* Forward pass for one example; returns the cross-entropy loss, fills h and p. */
static double forward(const double *x, int y, int H) {
    for (int j = 0; j < H; j++) {
        double a = B1[j];
        for (int i = 0; i < D; i++) a += W1[j][i] * x[i];
        h[j] = a > 0 ? a : 0;
    }
    double m = -INFINITY;
    for (int k = 0; k < K; k++) {
        double a = B2[k];
        for (int j = 0; j < H; j++) a += W2[k][j] * h[j];
        p[k] = a;
        if (a > m) m = a;
    }
    double sum = 0;
    for (int k = 0; k < K; k++) {
        p[k] = exp(p[k] - m);
        sum += p[k];
    }
    for (int k = 0; k < K; k++) p[k] /= sum;
    return -log(p[y] > 1e-300 ? p[y] : 1e-300);
}

static int argmax(void) {
    int best = 0;
    for (int k = 1; k < K; k++)
        if (p[k] > p[best]) best = k;
    return best;
}

static void evaluate(const int *idx, int n, int H, double *acc, double *loss) {
    int right = 0;
    double total = 0;
    for (int t = 0; t < n; t++) {
        total += forward(X[idx[t]], Y[idx[t]], H);
        right += argmax() == Y[idx[t]];
    }
    *acc = n ? (double)right / n : 0;
    *loss = n ? total / n : 0;
}

static int usage(const char *why) {
    fprintf(stderr, "train: %s\nusage: train LR HIDDEN L2 EPOCHS SEED < digits.csv\n", why);
    return 2;
}

int main(int argc, char **argv) {
    if (argc != 6) return usage("expected 5 arguments");
    char *end;
    double lr = strtod(argv[1], &end);
    if (*end || !(lr > 0 && lr < 10)) return usage("learning rate must be in (0, 10)");
    long H = strtol(argv[2], &end, 10);
    if (*end || H < 1 || H > MAX_H) return usage("hidden units must be 1..256");
    double l2 = strtod(argv[3], &end);
    if (*end || !(l2 >= 0 && l2 < 1)) return usage("L2 must be in [0, 1)");
    long epochs = strtol(argv[4], &end, 10);
    if (*end || epochs < 1 || epochs > 200) return usage("epochs must be 1..200");
    long long seed = strtoll(argv[5], &end, 10);
    if (*end) return usage("seed must be an integer");

    int n = read_data();
    if (n < 10) {
        fprintf(stderr, "train: stdin is not the digits CSV (64 pixels 0..16, then a label 0..9)\n");
        return 3;
    }
    int ntrain = 0, nval = 0;
    for (int i = 0; i < n; i++) {
        if (i % 5 == 0) val_idx[nval++] = i;
        else train_idx[ntrain++] = i;
    }

    rng_state = (uint64_t)seed;
    double r1 = sqrt(6.0 / D), r2 = sqrt(6.0 / H);
    for (int j = 0; j < H; j++) {
        for (int i = 0; i < D; i++) W1[j][i] = (2 * uniform() - 1) * r1;
        B1[j] = 0;
    }
    for (int k = 0; k < K; k++) {
        for (int j = 0; j < H; j++) W2[k][j] = (2 * uniform() - 1) * r2;
        B2[k] = 0;
    }

    double decay = 1 - lr * l2;
    for (long e = 0; e < epochs; e++) {
        for (int t = ntrain - 1; t > 0; t--) {
            int u = (int)(next_u64() % (uint64_t)(t + 1));
            int tmp = train_idx[t];
            train_idx[t] = train_idx[u];
            train_idx[u] = tmp;
        }
        for (int t = 0; t < ntrain; t++) {
            const double *x = X[train_idx[t]];
            int y = Y[train_idx[t]];
            forward(x, y, (int)H);
            /* dLoss/dlogit = p - onehot(y) */
            p[y] -= 1;
            for (int j = 0; j < H; j++) {
                double g = 0;
                for (int k = 0; k < K; k++) g += W2[k][j] * p[k];
                dh[j] = h[j] > 0 ? g : 0;
            }
            for (int k = 0; k < K; k++) {
                for (int j = 0; j < H; j++) W2[k][j] = W2[k][j] * decay - lr * p[k] * h[j];
                B2[k] -= lr * p[k];
            }
            for (int j = 0; j < H; j++) {
                if (dh[j] == 0) {
                    if (l2 > 0)
                        for (int i = 0; i < D; i++) W1[j][i] *= decay;
                    continue;
                }
                for (int i = 0; i < D; i++) W1[j][i] = W1[j][i] * decay - lr * dh[j] * x[i];
                B1[j] -= lr * dh[j];
            }
        }
    }

    double val_acc, val_loss, train_acc, train_loss;
    evaluate(val_idx, nval, (int)H, &val_acc, &val_loss);
    evaluate(train_idx, ntrain, (int)H, &train_acc, &train_loss);
    if (!isfinite(val_loss)) val_loss = -1; /* diverged: JSON has no NaN */
    if (!isfinite(train_loss)) train_loss = -1;
    printf("{\"lr\":%.10g,\"hidden\":%ld,\"l2\":%.10g,\"epochs\":%ld,\"seed\":%lld,"
           "\"val_accuracy\":%.4f,\"val_loss\":%.4f,\"train_accuracy\":%.4f,\"train_loss\":%.4f,"
           "\"train_size\":%d,\"val_size\":%d}\n",
           lr, H, l2, epochs, seed, val_acc, val_loss, train_acc, train_loss, ntrain,
           nval);
    return 0;
}
