"""The rules of the contract, as plain async functions of request bytes to reply bytes."""
