"""The compression report: every measured number, as JSON, markdown and a terminal table."""

from netpress.report.report import Report

__all__ = ["Report"]
