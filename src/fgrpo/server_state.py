"""The server's whole state between rounds (global adapter, client baselines, server optimizer moments,
local-only clients' own adapters): what a checkpoint holds (``fgrpo.checkpoint``), what the model host
evaluates and saves (``fgrpo.host``), and what the server side of a round updates (``fgrpo.server``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fgrpo import aggregation
from fgrpo.aggregation import Adapter, ClientBaseline


@dataclass
class ServerState:
    """Everything the server keeps between rounds; ``tensors_and_json`` is its checkpoint."""

    global_adapter: Adapter
    client_baselines: dict[str, ClientBaseline] = field(default_factory=dict)
    optimizer: aggregation.ServerOptimizerState = field(default_factory=aggregation.ServerOptimizerState)
    local_adapters: dict[str, Adapter] = field(default_factory=dict)  # local-only: each client's own adapter

    def tensors_and_json(self) -> tuple[Adapter, dict]:
        tensors = {f"global/{k}": v for k, v in self.global_adapter.items()}
        for moment in ("m", "v"):
            tensors.update({f"server_{moment}/{k}": v for k, v in (getattr(self.optimizer, moment) or {}).items()})
        for client_id, adapter in self.local_adapters.items():
            tensors.update({f"local/{client_id}/{k}": v for k, v in adapter.items()})
        state = {"client_baselines": {k: asdict(v) for k, v in self.client_baselines.items()},
                 "server_step": self.optimizer.step, "local_clients": list(self.local_adapters)}
        return tensors, state

    @classmethod
    def from_tensors_and_json(cls, tensors: Adapter, state: dict) -> ServerState:
        def part(prefix: str) -> Adapter:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(part("global/"),
                   {k: ClientBaseline(**v) for k, v in state["client_baselines"].items()},
                   aggregation.ServerOptimizerState(state["server_step"], part("server_m/") or None,
                                                    part("server_v/") or None),
                   {c: part(f"local/{c}/") for c in state.get("local_clients", [])})


def clone(adapter: Adapter) -> Adapter:
    return {k: v.detach().clone() for k, v in adapter.items()}
