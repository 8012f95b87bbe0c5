"""Defaults the command line shows in ``--help`` and the layers above it use, kept here, below them all,
so that building the parser imports none of torch, timm or onnx: ``imgclf --help`` and a refused
setting answer in a fraction of a second."""

DEFAULT_BUDGET_S = 120.0  # the default's time for its candidates (workflows.autoselect)
DIST_BACKENDS = ("auto", "nccl", "gloo")  # --dist-backend (training.distributed)
DEFAULT_DIST_TIMEOUT_S = 600.0  # joining and every collective; torch's own default (30 min) looks like a hang
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a typo, and torch's timedelta overflows far beyond
DEFAULT_OPSET = 18  # the lowest opset torch's exporter writes; loads in every onnxruntime since 1.14
DEFAULT_MAX_PIXELS = 50_000_000  # a 48-megapixel photo fits: 150 MB decoded as 8-bit RGB, ~1.6 GB if 16-bit or float
