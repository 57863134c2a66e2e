"""profile.json: every run of a profile beside its estimate, and the recommendations.

Schema (``schema_version`` 1; add fields freely, rename or remove only with a new version),
``ProfileDocument.to_json()``:
  {schema_version, kind: "profile", tool {name, version}, created, command, config (the
   ProfileConfig as given), model (the `dpplan estimate` model summary), device {type, gpus,
   gpu, description}, notices[], interrupted, out_dir, runs: [run...], recommendations}
  run: profile_results.py; recommendations: recommendation_results.py (absent until every
  run has finished, so an interrupted profile has none).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dpplan.json_file import SCHEMA_VERSION, TOOL_NAME
from dpplan.planner.plan import ModelSummary
from dpplan.profiler.profile_results import RunResult
from dpplan.profiler.recommendation_results import Recommendations

KIND = "profile"


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """What the runs executed on."""

    type: str
    """cuda or cpu (the key profile.json has always used)."""
    gpus: int
    """Total ranks."""
    gpu: str | None
    """Catalog key of the estimates (cuda); None on cpu."""
    description: str

    @classmethod
    def from_json(cls, data: dict) -> DeviceInfo:
        return cls(type=data["type"], gpus=data["gpus"], gpu=data.get("gpu"), description=data["description"])


def _model(data: dict | None) -> ModelSummary | None:
    return None if data is None else ModelSummary.from_json(data)


@dataclass(frozen=True, kw_only=True)
class ProfileDocument:
    dpplan_version: str
    created: str | None
    """UTC, ISO 8601, to the second (None: not recorded)."""
    command: str | None
    """The command line that made it (None when called as a library)."""
    config: dict
    """The request as written (ProfileConfig's fields); kept as JSON, as every output file
    records its config, so that a file from an older config shape still reads back."""
    model: ModelSummary | None
    device: DeviceInfo
    notices: tuple[str, ...]
    out_dir: str
    interrupted: bool = False
    runs: tuple[RunResult, ...] = ()
    recommendations: Recommendations | None = None

    def with_run(self, run: RunResult) -> ProfileDocument:
        return replace(self, runs=(*self.runs, run))

    def to_json(self) -> dict:
        data = {
            "schema_version": SCHEMA_VERSION, "kind": KIND, "tool": {"name": TOOL_NAME, "version": self.dpplan_version},
            "created": self.created, "command": self.command, "config": self.config,
            "model": asdict(self.model) if self.model else None, "device": asdict(self.device),
            "notices": list(self.notices), "interrupted": self.interrupted, "out_dir": self.out_dir,
            "runs": [run.to_json() for run in self.runs],
        }
        if self.recommendations is not None:  # absent until the runs are done (see the schema)
            data["recommendations"] = self.recommendations.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> ProfileDocument:
        """A profile.json read back; ValueError (one line) when a required key is missing."""
        try:
            return cls(
                dpplan_version=(data.get("tool") or {}).get("version", "unknown"), created=data.get("created"),
                command=data.get("command"), config=data["config"], model=_model(data.get("model")),
                device=DeviceInfo.from_json(data["device"]), notices=tuple(data.get("notices") or ()),
                out_dir=data["out_dir"], interrupted=bool(data.get("interrupted")),
                runs=tuple(RunResult.from_json(run) for run in data.get("runs") or ()),
                recommendations=Recommendations.from_json(data.get("recommendations")),
            )
        except KeyError as exc:
            raise ValueError(f"not a complete profile JSON: no {exc.args[0]!r} key") from None
        except TypeError as exc:  # a record with a key missing: the dataclass names it
            raise ValueError(f"not a complete profile JSON: {exc}") from None


def write_profile(document: ProfileDocument, out_dir: Path) -> Path:
    """Write ``out_dir/profile.json`` atomically (a reader never sees half a file)."""
    path = out_dir / "profile.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(document.to_json(), indent=2) + "\n")
    temp.replace(path)
    return path
