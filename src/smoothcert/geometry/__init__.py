"""Certified regions and their geometry: balls, ellipsoids, l1 regions, distances and intersection tests.

Every answer errs toward the smaller region: distances are lower bounds, "disjoint" is returned only with a
separating direction checked in exact form.
"""

from smoothcert.geometry.distance import distance_to_region, distances, largest_ball_outside
from smoothcert.geometry.intersection import intersects, intersects_each, k_function
from smoothcert.geometry.lowrank import LowRankEllipsoid
from smoothcert.geometry.regions import Ball, CrossPolytope, Ellipsoid, Region
from smoothcert.geometry.tolerances import basis_error, inscribed_lower, outer_radius

__all__ = [
    "Ball", "CrossPolytope", "Ellipsoid", "LowRankEllipsoid", "Region", "distance_to_region", "distances", "largest_ball_outside",
    "intersects", "intersects_each", "k_function", "basis_error", "inscribed_lower", "outer_radius",
]
