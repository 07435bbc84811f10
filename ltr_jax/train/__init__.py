"""Training the output-length ranker.

Modules: `data` (prompt sources, labels, id-hash split, chat-template rendering), `losses` (ListMLE, log-length
regression, bucket classification), `features` (cached frozen backbone features), `trainer` (config and recipe),
`evaluate` (Kendall tau-b, pair accuracy), `checkpoint` (Orbax export/restore), `label` (the labeling job that
produces the serving model's own output lengths). Entry point: ``python -m ltr_jax.train --config ...``.
"""
