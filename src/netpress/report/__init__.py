"""The compression report: every measured number, as JSON, markdown and a terminal table."""

from netpress.report.report import Report, ReportWarning

__all__ = ["Report", "ReportWarning"]
