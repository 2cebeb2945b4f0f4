"""Data: the Dataloader and example builders."""

from kithara.data.dataloader import Dataloader

__all__ = ["Dataloader"]
