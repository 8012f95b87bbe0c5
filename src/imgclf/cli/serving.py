"""``imgclf export`` and ``imgclf serve``: shipping a trained run (ONNX with its preprocessing; an HTTP API)."""

from __future__ import annotations

from imgclf.cli.usage import lazy, whole_number
from imgclf.config.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OPSET


def add_serving_parsers(sub) -> None:
    """The ``export`` and ``serve`` sub-parsers, added to ``build_parser``'s subcommands."""
    p = sub.add_parser("export", help="write RUN/export/model.onnx (preprocessing inside) after proving parity")
    p.add_argument("run", help="run or ensemble directory")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--data", help="dataset folder, if it moved since training (the parity gate reads val images)")
    p.set_defaults(func=lazy("runtools", "cmd_export"))

    p = sub.add_parser("serve", help="HTTP API and a drop-an-image page for a run")
    p.add_argument("run", help="run or ensemble directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole_number(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every endpoint but /healthz, /readyz")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"],
                   help="auto: onnx when RUN/export exists, else torch")
    p.add_argument("--max-batch", type=int, default=16, help="most files in one request (default 16)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MB (default 10)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image, in pixels, decoded (default {DEFAULT_MAX_PIXELS:,})")
    p.set_defaults(func=lazy("runtools", "cmd_serve"))
