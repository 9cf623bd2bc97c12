"""What the relay's AWS clients share: botocore's credential chain and SigV4
signing (:mod:`~emailrelay.aws.signing`), and the AWS SDKs' rules for the
region and a service's endpoint (:mod:`~emailrelay.aws.endpoints`).

Knows nothing of emailrelay: the SQS client (:mod:`emailrelay.sqs`) and the
SES v2 transport (:mod:`emailrelay.mail.ses`) both build on it.
"""
