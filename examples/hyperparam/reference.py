"""The reference figure for the README: scikit-learn on the same data and the same split.

    python3 -m venv /tmp/skv && /tmp/skv/bin/pip install scikit-learn
    /tmp/skv/bin/python examples/hyperparam/reference.py

Split as in train.c: line i of digits.csv is validation when i % 5 == 0. Features scaled to
[0, 1] (pixel / 16), as train.c does.
"""
import pathlib

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

data = np.loadtxt(pathlib.Path(__file__).with_name("digits.csv"), delimiter=",")
X, y = data[:, :64] / 16.0, data[:, 64].astype(int)
val = np.arange(len(y)) % 5 == 0
Xt, yt, Xv, yv = X[~val], y[~val], X[val], y[val]

logreg = LogisticRegression(max_iter=5000).fit(Xt, yt)
print(f"LogisticRegression (default C=1.0): validation accuracy {logreg.score(Xv, yv):.4f}")
best = 0.0
for hidden in (16, 32, 64):
    for alpha in (1e-4, 1e-3, 1e-2):
        for seed in range(3):
            mlp = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=2000,
                                random_state=seed).fit(Xt, yt)
            best = max(best, mlp.score(Xv, yv))
print(f"MLPClassifier (adam; hidden 16/32/64, alpha 1e-4..1e-2, 3 seeds): best validation accuracy {best:.4f}")
