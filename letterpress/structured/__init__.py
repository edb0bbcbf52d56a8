"""Structured output by constrained denoising: a JSON schema, regex or choice list becomes a token automaton
(regex.py, automaton.py: outlines-core), and every canvas a constrained request commits is the most probable
one the automaton accepts (dp.py, constraint.py). README, "Structured output"."""

from .automaton import TokenAutomaton, compile_regex
from .constraint import Constraint, StructuredOutputsParams
from .dp import best_path
from .regex import GEMMA, JSON, SchemaError, choice_regex, json_object_regex, schema_regex, tool_call_regex

__all__ = ["Constraint", "GEMMA", "JSON", "SchemaError", "StructuredOutputsParams", "TokenAutomaton", "best_path",
           "choice_regex", "compile_regex", "json_object_regex", "schema_regex", "tool_call_regex"]
