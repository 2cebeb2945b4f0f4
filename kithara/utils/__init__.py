"""Small utilities shared by objectives."""

from kithara.utils.running_moments import Moments, RunningMoments, batch_moments, merge

__all__ = ["Moments", "RunningMoments", "batch_moments", "merge"]
