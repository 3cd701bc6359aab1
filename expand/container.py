"""`Model`: a config and its params, with where they came from: what `expand.load` returns and every
verb takes. Below io, surgery and the model code, so each of them can name it."""

from __future__ import annotations

import dataclasses

from expand.config import Config
from expand.params import Params
from expand.provenance import Provenance


@dataclasses.dataclass(frozen=True)
class Model:
    """Config and params, with where they came from. Unpacks as `config, params = expand.load(path)`.

    source: the path (or embedded name) the weights and tokenizer were read from.
    provenance: the base-layer map and history of a grown or pruned model (None for a plain checkpoint).
    """

    config: Config
    params: Params
    source: str | None = None
    provenance: Provenance | None = None

    def __iter__(self):
        return iter((self.config, self.params))

    def lineage(self) -> Provenance:
        """The provenance, or the identity map of a model that is its own base."""
        return self.provenance or Provenance.identity(self.config, self.source)
