"""``query_knowledge``: the eight skill cards, read from markdown files.

Cards are read on every call (they are tiny) so that editing a card in the
studio takes effect on the next episode without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..records.schema import SKILLS


class SkillCards:
    """Skill cards at ``<skills_dir>/<name>.md`` for the official skill names."""

    def __init__(self, skills_dir: str | os.PathLike):
        self.skills_dir = Path(skills_dir)

    def path(self, skill_name: str) -> Path:
        return self.skills_dir / f"{skill_name}.md"

    def names(self) -> list[str]:
        """Official skill names whose card file exists, in the official order."""
        return [name for name in SKILLS if self.path(name).is_file()]

    def query(self, skill_name: str) -> str:
        name = str(skill_name).strip()
        if name not in SKILLS:
            return f"Unknown skill '{name}'. Available skills: " + ", ".join(SKILLS)
        path = self.path(name)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            return f"Skill '{name}' has no card: expected file {path}"
        return f"## Skill Guidance\n\n=== Skill: {name} ===\n{text}"
