"""Neuron measures of a checkpoint and RC-ansatz diagnostics.

features.py    per-axis neuron features (mean-field units), read tensor by tensor
stats.py       per-tensor row/column statistics
estimators.py  empirical / kde / gaussian neuron measures, held-out log-likelihood
fit.py         per-axis measures fitted from a checkpoint (Gram matrices, residuals)
rc.py          RC covariance test, Wasserstein-1 / KS distances
report.py      `growkit.inspect` and its report; plots.py the PNGs; command.py `growkit inspect`
"""
