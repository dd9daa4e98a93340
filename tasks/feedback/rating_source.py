"""What people rate: the replies of a completed ``evaluate`` stage, paired across models.

For every ``kind: pairwise`` suite the stage writes ``samples/<model>/<suite>.jsonl`` (rows with
``id``, ``prompt``, ``reply``) per model. Every two models' replies to the same prompt are one
``RatedPair``; pairs whose replies are identical are left out (there is nothing to choose).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

from tasks.errors import CrucibleError
from tasks.feedback.votes import RatedPair
from tasks.store import MANIFEST, StageDir, join_uri, read_text

if TYPE_CHECKING:
    from tasks.config import PipelineConfig
    from tasks.engine import PlannedStage
    from tasks.stage import Manifest

REPORT_CARD = "report_card.md"


@dataclass(frozen=True)
class RatingSource:
    """An evaluate output folder (local path or URI), its files (relative) and its pairwise suites."""

    folder: str
    files: tuple[str, ...]
    suites: tuple[str, ...]

    @classmethod
    def from_config(cls, config: PipelineConfig, config_path: str) -> RatingSource:
        """The config's complete evaluate stage, found as ``crucible status`` finds it: the
        planned fingerprint's manifest. ``CrucibleError`` says what to run when there is none."""
        from tasks.engine import plan

        section = config.section("evaluate")
        if section is None:
            raise CrucibleError(f"{config_path}: no evaluate section, so there are no replies to rate")
        suites = tuple(s.name for s in section.suites if s.kind == "pairwise")
        if not suites:
            raise CrucibleError(f"{config_path}: evaluate.suites has no `kind: pairwise` suite, so there are no replies to rate")
        planned = plan(config)["evaluate"]
        manifest = planned.manifest() or latest_of_the_same_models(planned)
        if manifest is None:
            raise CrucibleError(
                f"{config_path}: the evaluate stage is not complete (fingerprint {planned.fingerprint}); "
                f"run the pipeline first: crucible run {config_path}"
            )
        if manifest.fingerprint != planned.fingerprint:
            print(f"Rating the replies of evaluate {manifest.fingerprint}: the report card is out of date (new votes); "
                  f"`crucible run {config_path}` brings it up to date with the same replies.")
        return cls(manifest.path, tuple(manifest.files), suites)

    def pairs(self) -> list[RatedPair]:
        """Every pair of models on every prompt the two both answered, suite by suite."""
        pairs = []
        for suite in self.suites:
            replies = {
                path.split("/")[1]: self._rows(path)
                for path in self.files
                if path.startswith("samples/") and path.count("/") == 2 and path.endswith(f"/{suite}.jsonl")
            }
            for model_a, model_b in combinations(sorted(replies), 2):
                for prompt_id, row_a in replies[model_a].items():
                    row_b = replies[model_b].get(prompt_id)
                    if row_b is not None and row_a["reply"] != row_b["reply"]:
                        pairs.append(RatedPair(suite, prompt_id, row_a["prompt"], model_a, row_a["reply"], model_b, row_b["reply"]))
        return pairs

    def report_card(self) -> str:
        """The evaluate stage's report card (markdown), or "" when the folder has none."""
        return read_text(join_uri(self.folder, REPORT_CARD)) if REPORT_CARD in self.files else ""

    def _rows(self, relative: str) -> dict[str, dict]:
        """A samples file's rows by prompt id; a row without ``id``/``prompt``/``reply`` is an error naming the file and line."""
        rows = {}
        for number, line in enumerate(read_text(join_uri(self.folder, relative)).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.folder}/{relative}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CrucibleError(f"{where}: malformed JSON: {exc.msg}") from None
            missing = [key for key in ("id", "prompt", "reply") if not isinstance(row, dict) or not isinstance(row.get(key), str)]
            if missing:
                raise CrucibleError(f"{where}: no string field {', '.join(missing)}")
            rows[row["id"]] = row
        return rows


def latest_of_the_same_models(planned: PlannedStage) -> Manifest | None:
    """The newest complete evaluate output whose upstream models are the planned ones.

    Votes are an input of ``evaluate`` (its report card shows them), so every vote makes the
    planned output stale; the replies to rate are the same models' greedy replies all the same.
    """
    import pyarrow.fs as pafs

    from tasks.stage import Manifest

    parent = planned.out.parent()
    found = []
    for info in parent.fs.get_file_info(pafs.FileSelector(parent.root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        sibling = StageDir(fs=parent.fs, root=info.path, uri=join_uri(parent.uri, info.base_name))
        data = sibling.read_json(MANIFEST)
        if data is not None and data.get("upstream") == planned.upstream:
            found.append(Manifest.model_validate(data))
    return max(found, key=lambda m: m.finished_at, default=None)
