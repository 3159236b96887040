"""Errors of the container layer, each carrying the google.rpc code name the Task service answers
with (the runc shim's mapping: unknown ID -> NOT_FOUND, duplicate -> ALREADY_EXISTS, wrong state ->
FAILED_PRECONDITION, bad input -> INVALID_ARGUMENT, runtime failure -> UNKNOWN)."""


class TaskError(Exception):
    """`code` is a google.rpc code name (e.g. "NOT_FOUND"); str(error) is the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def not_found(message: str) -> TaskError:
    return TaskError("NOT_FOUND", message)


def already_exists(message: str) -> TaskError:
    return TaskError("ALREADY_EXISTS", message)


def failed_precondition(message: str) -> TaskError:
    return TaskError("FAILED_PRECONDITION", message)


def invalid_argument(message: str) -> TaskError:
    return TaskError("INVALID_ARGUMENT", message)
