"""trakview's one error hierarchy: everything wrong with the user's input, run or environment.

Every such error is a ``TrakviewError``; the command line and the dashboard catch that base alone
and show its message in one line, so anything else (a bug) keeps its traceback. The classes also
subclass ``ValueError``, so code that caught ``ValueError`` around trakview calls keeps working.
Messages say what was expected, what was received, and how to fix it.
"""

from __future__ import annotations


class TrakviewError(ValueError):
    """Base of every error about the user's input, data, run or environment."""


class ConfigError(TrakviewError):
    """Settings that cannot be used together or out of their range (flags, config files)."""


class DataError(TrakviewError):
    """A pair list or data source that cannot be used as it is."""


class ImageProblem(DataError):
    """An image that cannot be used; the message is the reason recorded in skipped.jsonl."""


class InputError(TrakviewError):
    """A query image, caption or id that cannot be used."""


class CheckpointError(TrakviewError):
    """A checkpoint file cannot be read or is not a CLIP state dict."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's parameters do not fit the model's architecture."""


class UnknownModelError(TrakviewError):
    """A model name that neither open_clip nor trakview knows."""


class DeviceError(TrakviewError):
    """A device asked for that this machine (or a worker of the cluster) does not have."""


class ResourceError(TrakviewError):
    """The machine ran out of something: memory, or a worker process that died."""


class RunError(TrakviewError):
    """A run directory that is missing, incomplete or of another format version."""


class RunMismatchError(RunError):
    """A run directory was started with other settings than the ones given now."""


class RunBusyError(RunError):
    """A run directory that another live process is writing."""


class ExecutorError(ConfigError):
    """An executor that cannot be used as asked (Ray missing, flags that do not apply)."""


class ExportError(TrakviewError):
    """An export that cannot be written as asked (format, missing image, output path)."""


class EvalError(TrakviewError):
    """An evaluation that cannot run as asked (bad settings, a run without what it needs)."""


class EvalMismatchError(EvalError):
    """Cached evaluation models were made with other settings than the ones given now."""


class CurateError(TrakviewError):
    """A basket, a selection or a cleaned-set export that cannot be made as asked."""


class CompareError(EvalError):
    """Two runs that cannot be compared (no shared validation pair, incomparable margins)."""
