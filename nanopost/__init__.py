"""nanopost: LLM post-training you can read in an afternoon.

The public entry points, importable from the package itself:

    from nanopost import load_model, save_model, load_tokenizer, generate
"""

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "plumbing.hf_io",
    "save_model": "plumbing.hf_io",
    "load_tokenizer": "plumbing.hf_io",
    "generate": "generate",
    "Transformer": "model",
    "Tokenizer": "plumbing.tokenizer",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    # Imported on first use, so that `import nanopost.plumbing.config` (a script's --help) does not load torch.
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'nanopost' has no attribute {name!r}")
