"""graft-trio: an embeddable workflow engine and distributed job runner for trio, replicated by Raft."""

from graft_trio.workflow.types import (
    NextNode,
    Node,
    NodeConfig,
    NodeContext,
    NodeRegistrationError,
    NodeResult,
    NonRetryableError,
    PayloadError,
    RetryPolicy,
    StepInfo,
    StepStatus,
    WorkflowExistsError,
    WorkflowNotFoundError,
    WorkflowState,
    WorkflowStatus,
    WorkflowTrigger,
)

__version__ = "0.1.0"

__all__ = [
    "NextNode",
    "Node",
    "NodeConfig",
    "NodeContext",
    "NodeRegistrationError",
    "NodeResult",
    "NonRetryableError",
    "PayloadError",
    "RetryPolicy",
    "StepInfo",
    "StepStatus",
    "WorkflowExistsError",
    "WorkflowNotFoundError",
    "WorkflowState",
    "WorkflowStatus",
    "WorkflowTrigger",
]
