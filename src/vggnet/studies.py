"""``vggnet reproduce``: the study ``--study`` names, each in its own module."""

from __future__ import annotations

from .settings import StudySettings


def reproduce_command(s: StudySettings) -> int:
    """Tables 3-6 (``vggnet.reproduce``) or Tables 8-9 (``vggnet.reproduce_localisation``)."""
    if s.study == "localisation":
        from .reproduce_localisation import localisation_study_command

        return localisation_study_command(s)
    from .reproduce import reproduce_command as classification

    return classification(s)
