"""What `evaluation_report` records: the gate's decision and where the report is."""

from pipeline.upstream import AssetRecord


class EvaluationReportRecord(AssetRecord):
    asset = "evaluation_report"

    ldm_uri: str
    report_html: str
    metrics_json: str
    gate_passed: bool
    gate_reasons: list[str]
    promotion: str
    """promoted, kept_champion (…) or gate_failed, with what it was compared with."""
    champion_before: str
    champion_after: str
