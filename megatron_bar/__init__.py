"""megatron-bar: BAR (Branch-Adapt-Route) modular post-training on megatron-core."""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load a megatron_bar checkpoint; see :func:`megatron_bar.model.load.load_model`."""
    from megatron_bar.model.load import load_model as _load_model

    return _load_model(path, **kwargs)


__all__ = ["load_model", "__version__"]
