"""Needle-in-a-haystack (NIAH): generators, small trainer, depth x length eval.

    python -m eval.niah --preset quick|routing|passkey [--out DIR] [--name NAME]
                        [--steps N] [--variants V ...] [--seeds S ...] ...

trains one small `train.model.Transformer` per (variant, seed) at
`--train-len` tokens, evaluates exact-match accuracy over a depth x length
grid, and writes (all under `--out`, file names prefixed by `--name`):

- `<name>.json`: settings and one entry per finished (variant, seed), rewritten
  atomically after each one; a rerun skips the entries already there, so an
  interruption loses at most the run in progress.
- `<name>_<variant>.png`: Kamradt-style heatmap (depth % on y, length on x),
  mean accuracy over the seeds.
- `<name>.md`: the report (settings, table, heatmaps, span analysis). The text
  between `<!-- reading -->` and `<!-- /reading -->` of an existing report is
  kept when the report is rewritten (hand-written analysis).

Presets: `quick` (the README's main job: a real-text NIAH, a hybrid
sliding-window + superlinear model against sliding window alone, a few
minutes on a 2-core CPU), `routing` (L = 1024 real-text NIAH where the
superlinear layer must route; see docs/results.md), `passkey` (the synthetic
passkey comparison of routing keys behind docs/niah.md).

The package, one module per idea: `tasks` (the generators), `training`
(model variants and the trainer), `evaluate` (the accuracy grid), `spans`
(do the selected spans contain the needle?), `report` (heatmaps, tables,
`<name>.md`), `cli` (presets, the run loop; the progress bar is
`eval.progress`).
"""

from eval.niah.cli import PRESETS, main, run_cost
from eval.niah.evaluate import evaluate_grid
from eval.niah.report import (beyond_window, format_grid, plot_heatmap, summary, targets,
                              write_report)
from eval.niah.spans import coverage, needle_anchor_hits, random_anchors, span_hits
from eval.niah.tasks import NiahBatch, PasskeyTask, TextNeedleTask, make_batch, marker_positions
from eval.niah.training import SUPERLINEAR_KW, VARIANTS, model_config, train_model

__all__ = [
    "NiahBatch", "PRESETS", "PasskeyTask", "SUPERLINEAR_KW", "TextNeedleTask", "VARIANTS",
    "beyond_window", "coverage", "evaluate_grid", "format_grid", "main", "make_batch",
    "marker_positions", "model_config", "needle_anchor_hits", "plot_heatmap",
    "random_anchors", "run_cost", "span_hits", "summary", "targets", "train_model",
    "write_report",
]
