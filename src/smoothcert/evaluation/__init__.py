"""Reading results: certified accuracy, ACR, ARI, tables, curves and region plots."""

from smoothcert.evaluation.tables import (average_certified_radius, average_radius_improvement, certified_accuracy,
                                          load_results, plot_curves, report)

__all__ = ["average_certified_radius", "average_radius_improvement", "certified_accuracy", "load_results",
           "plot_curves", "report"]
