"""Tasks people decide (approval steps, manual tasks) and the one-time links that decide
them or resume waiting runs. Importing the package registers the run-finished listener
(open tasks close with their run; failures reach their workflow's people)."""

from backend.inbox import hooks as hooks
