"""``vggnet reproduce``: the study ``--study`` names, each in its own module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .settings import StudySettings


def reproduce_command(s: StudySettings) -> int:
    """Tables 3-6 (``vggnet.reproduce``) or Tables 8-9 (``vggnet.reproduce_localisation``), in
    --out (an earlier study's resumes it) or a new reproduce/[STUDY-]PRESET-DATE folder."""
    if s.out is None:
        from .runlog import dated_folder

        name = s.preset if s.study == "classification" else f"{s.study}-{s.preset}"
        s = dataclasses.replace(s, out=str(dated_folder(Path("reproduce"), name)))
        print(f"study folder {s.out}; to resume it after an interruption, run the same command "
              f"with --out {s.out}", flush=True)
    if s.study == "localisation":
        from .reproduce_localisation import localisation_study_command

        return localisation_study_command(s)
    from .reproduce import reproduce_command as classification

    return classification(s)
