"""dmlnb: Deep Metric Learning with Self-Supervised Ranking (Fu et al., AAAI 2021), as a study package.

The library is thin and split by the paper's words:

- :mod:`dmlnb.data`        datasets (embedded ``glyphs``, Fashion-MNIST, digits, CUB-200, Cars196, SOP)
- :mod:`dmlnb.views`  views of increasing strength (the self-supervised task)
- :mod:`dmlnb.model`       shared backbone, metric head, SSR head
- :mod:`dmlnb.losses`      the DML losses and the ranking loss
- :mod:`dmlnb.metrics`     Recall@K, R-Precision, MAP@R, NMI, F1 and intra-class measures
- :mod:`dmlnb.train`       ``fit(config)``: L = L_metric + gamma * L_rank
"""

__version__ = "0.1.0"
