"""Every error merge_dag raises on bad input. Each message names the file, key or tensor."""


class MergeDagError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class RecipeError(MergeDagError):
    """A recipe file is malformed: unknown key, unknown method, missing or out-of-range parameter."""


class CheckpointError(MergeDagError):
    """A model folder cannot be read: missing, pickled only, truncated or corrupt safetensors."""


class MergeInputError(MergeDagError):
    """The inputs of a merge disagree: tensor names, shapes, non-finite values, duplicates."""


class MissingTensorError(MergeInputError):
    """A tensor is in some inputs and not in others, and the recipe's `missing_tensors` does not say
    how to merge it (the message names the tensor, the models that have it and those that lack it)."""


class OutputError(MergeDagError):
    """The output cannot be written where asked: a folder merge_dag may not replace (a user's folder,
    an input, the working directory), or the file system refused (disk full, read-only)."""


class MergeOutputError(MergeDagError):
    """A merge produced a tensor that cannot be written: NaN or Inf after the arithmetic or the cast."""


class AdapterError(CheckpointError):
    """A LoRA adapter folder cannot be read, or does not fit its base (module names, shapes, ranks)."""


class SearchError(MergeDagError):
    """A search file is malformed: unknown key, bad range, a parameter path the recipe does not have."""
