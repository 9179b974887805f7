"""The lab: the end-to-end benchmark harness behind `dlp-lora bench`. The library never imports it."""

from .harness import __doc__ as _harness_doc
from .harness import add_arguments, main, run

__doc__ = _harness_doc
__all__ = ["add_arguments", "main", "run"]
