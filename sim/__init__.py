"""moefleet.sim: replay hours of MoE traffic through moefleet's own autoscaling and placement
policies, with a cost model, and compare policies (`moefleet simulate SCENARIO.yaml`)."""

from .cost import Layout, PeriodCost, expert_rows_per_s, layout, load_s, merged_tokens, period_cost
from .load import Generated, Replayed, gini, load_source, popularity_profile, read_trace
from .policies import Fleet
from .report import run
from .run import Series, Summary, simulate, summarise, table
from .scenario import (
    CostConfig,
    FleetConfig,
    LoadConfig,
    ModelShape,
    PolicyConfig,
    Scenario,
    SpecError,
    load_scenario,
)

__all__ = [
    "CostConfig", "FleetConfig", "LoadConfig", "ModelShape", "PolicyConfig", "Scenario", "SpecError",
    "load_scenario", "Layout", "PeriodCost", "layout", "period_cost", "load_s", "expert_rows_per_s",
    "merged_tokens",
    "Generated", "Replayed", "gini", "popularity_profile", "load_source", "read_trace", "Fleet",
    "Series", "Summary", "simulate", "summarise", "table", "run",
]
