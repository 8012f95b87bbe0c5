"""Reporting: the only wing that draws. Plots, report.html, the Grad-CAM gallery and explanations."""
