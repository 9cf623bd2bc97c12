"""Settings from the environment: defaults, "empty means unset", parsing rules, start-up errors."""

from __future__ import annotations

import pytest

from emailrelay.config import ConfigError, SmtpTlsMode, load_settings


def test_contract_defaults() -> None:
    settings = load_settings({})
    assert settings.nats_urls == ("nats://localhost:4222",)
    assert settings.port == 8080
    assert settings.email_enabled is False
    assert (settings.smtp_host, settings.smtp_port) == ("localhost", 587)
    assert settings.default_from == "noreply@lfx.linuxfoundation.org"
    assert settings.default_from_display_name == "LFX Self Serve"
    assert settings.allowed_from_domains == ("lfx.linuxfoundation.org",)
    assert settings.allowed_reply_to_domains == ("linuxfoundation.org",)
    assert settings.allowed_recipient_domains == ()
    assert settings.smtp_credentials is None
    assert settings.ses_configuration_set is None
    assert settings.ses_eventing_enabled is False
    assert settings.log_level == "info"
    assert settings.log_add_source is False


def test_production_defaults() -> None:
    settings = load_settings({})
    assert settings.smtp_tls_mode is SmtpTlsMode.AUTO
    assert settings.smtp_pool_size == 64
    assert settings.max_in_flight == 256
    assert settings.send_timeout == 8.0
    assert settings.shutdown_grace_seconds == 25.0


def test_empty_value_means_unset() -> None:
    settings = load_settings({"SMTP_PORT": "", "DEFAULT_SMTP_FROM": "  ", "EMAIL_ENABLED": ""})
    assert settings.smtp_port == 587
    assert settings.default_from == "noreply@lfx.linuxfoundation.org"
    assert settings.email_enabled is False


def test_empty_from_allowlist_allows_none() -> None:
    assert load_settings({"SMTP_ALLOWED_FROM_DOMAINS": ""}).allowed_from_domains == ()


def test_empty_reply_to_allowlist_allows_none() -> None:
    assert load_settings({"SMTP_ALLOWED_REPLY_TO_DOMAINS": ""}).allowed_reply_to_domains == ()


def test_empty_recipient_allowlist_allows_all() -> None:
    assert load_settings({"SMTP_ALLOWED_RECIPIENT_DOMAINS": ""}).allowed_recipient_domains == ()


def test_lists_are_trimmed_and_case_folded() -> None:
    settings = load_settings({"SMTP_ALLOWED_FROM_DOMAINS": " A.Example , b.example,, "})
    assert settings.allowed_from_domains == ("a.example", "b.example")


@pytest.mark.parametrize("value", ["true", "TRUE", "t", "T", "1", "True"])
def test_true_spellings(value: str) -> None:
    assert load_settings({"EMAIL_ENABLED": value}).email_enabled is True


@pytest.mark.parametrize("value", ["false", "FALSE", "f", "F", "0", "False"])
def test_false_spellings(value: str) -> None:
    assert load_settings({"EMAIL_ENABLED": value}).email_enabled is False


def test_legacy_smtp_from_is_the_default_sender() -> None:
    assert load_settings({"SMTP_FROM": "legacy@lfx.example"}).default_from == "legacy@lfx.example"


def test_default_smtp_from_wins_over_legacy_smtp_from() -> None:
    settings = load_settings(
        {"SMTP_FROM": "legacy@lfx.example", "DEFAULT_SMTP_FROM": "new@lfx.example"}
    )
    assert settings.default_from == "new@lfx.example"


def test_legacy_smtp_from_applies_when_default_smtp_from_is_empty() -> None:
    settings = load_settings({"SMTP_FROM": "legacy@lfx.example", "DEFAULT_SMTP_FROM": ""})
    assert settings.default_from == "legacy@lfx.example"


def test_credentials_need_both_username_and_password() -> None:
    settings = load_settings({"SMTP_USERNAME": "u", "SMTP_PASSWORD": "p"})
    assert settings.smtp_credentials == ("u", "p")


def test_password_is_not_in_the_settings_repr() -> None:
    assert "hunter2" not in repr(load_settings({"SMTP_USERNAME": "u", "SMTP_PASSWORD": "hunter2"}))


def test_durations_accept_units() -> None:
    settings = load_settings({"SEND_TIMEOUT": "500ms", "SHUTDOWN_GRACE_SECONDS": "1m"})
    assert (settings.send_timeout, settings.shutdown_grace_seconds) == (0.5, 60.0)


def test_several_nats_urls() -> None:
    settings = load_settings({"NATS_URL": "nats://a:4222, tls://b:4222"})
    assert settings.nats_urls == ("nats://a:4222", "tls://b:4222")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SMTP_PORT": "abc"}, "SMTP_PORT"),
        ({"SMTP_PORT": "70000"}, "SMTP_PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"EMAIL_ENABLED": "maybe"}, "EMAIL_ENABLED"),
        ({"LOG_ADD_SOURCE": "yes"}, "LOG_ADD_SOURCE"),
        ({"NATS_URL": "http://x"}, "NATS_URL"),
        ({"NATS_URL": "nats://host:port"}, "NATS_URL"),
        ({"SMTP_TLS_MODE": "sometimes"}, "SMTP_TLS_MODE"),
        ({"SEND_TIMEOUT": "soon"}, "SEND_TIMEOUT"),
        ({"SMTP_POOL_SIZE": "0"}, "SMTP_POOL_SIZE"),
        ({"DEFAULT_SMTP_FROM": "not an address"}, "DEFAULT_SMTP_FROM"),
        ({"SMTP_USERNAME": "only-the-user"}, "SMTP_USERNAME"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"SES_EVENTING_ENABLED": "true"}, "SES_ENGAGEMENT_SQS_QUEUE_URL"),
    ],
)
def test_unusable_value_is_an_error_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(variable)
    assert "\n" not in message


def test_eventing_error_says_eventing_is_on() -> None:
    with pytest.raises(ConfigError, match="SES_EVENTING_ENABLED is true"):
        load_settings({"SES_EVENTING_ENABLED": "true", "SES_ENGAGEMENT_SQS_QUEUE_URL": ""})


def test_eventing_with_a_queue_url_is_fine() -> None:
    settings = load_settings(
        {
            "SES_EVENTING_ENABLED": "true",
            "SES_ENGAGEMENT_SQS_QUEUE_URL": "http://127.0.0.1:1/123/q",
        }
    )
    assert settings.ses_eventing_enabled is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMTP_PORT": "abc"}, 'SMTP_PORT must be a whole number from 1 to 65535 (got "abc")'),
        ({"SMTP_PORT": "0"}, 'SMTP_PORT must be a whole number from 1 to 65535 (got "0")'),
        ({"PORT": "70000"}, 'PORT must be a whole number from 0 to 65535 (got "70000")'),
        (
            {"SMTP_TLS_MODE": "sometimes"},
            'SMTP_TLS_MODE must be one of auto, implicit, starttls, none (got "sometimes")',
        ),
        (
            {"SEND_TIMEOUT": "0"},
            "SEND_TIMEOUT must be more than 0: seconds or a duration such as 500ms, 30s, 5m "
            '(got "0")',
        ),
        (
            {"EMAIL_ENABLED": "yes"},
            'EMAIL_ENABLED must be one of true, t, 1, false, f, 0 (got "yes")',
        ),
        ({"KV_REPLICAS": "9"}, 'KV_REPLICAS must be a whole number from 1 to 5 (got "9")'),
        (
            {"LOG_LEVEL": "loud"},
            'LOG_LEVEL must be one of debug, info, warn, error (got "loud")',
        ),
    ],
)
def test_configuration_errors_speak_in_one_voice(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "env",
    [
        {"SMTP_PORT": "abc"},
        {"SMTP_POOL_SIZE": "1.5"},
        {"SMTP_TLS_MODE": "x"},
        {"LOG_FORMAT": "xml"},
        {"SHUTDOWN_GRACE_SECONDS": "0"},
        {"SES_EVENT_MAX_RECEIVES": "0"},
    ],
)
def test_configuration_errors_never_show_raw_validation_output(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert "Input should" not in str(caught.value)
    assert "pydantic" not in str(caught.value)


def test_a_bad_nats_url_is_not_repeated_in_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"NATS_URL": "http://user:s3cret@nats.example:4222"})
    assert str(caught.value).startswith("NATS_URL must be nats://, tls://, ws:// or wss:// URLs")
    assert "s3cret" not in str(caught.value)


def test_issue_11_settings_default_to_off() -> None:
    settings = load_settings({})
    assert settings.smtp_max_send_rate == 0.0
    assert settings.idempotency_ttl == 24 * 3600.0
    assert settings.suppression_enabled is False


def test_idempotency_ttl_reads_a_duration() -> None:
    assert load_settings({"IDEMPOTENCY_TTL": "90m"}).idempotency_ttl == 5400.0


def test_max_send_rate_reads_a_fraction() -> None:
    assert load_settings({"SMTP_MAX_SEND_RATE": "12.5"}).smtp_max_send_rate == 12.5


def test_suppression_enabled_reads_a_boolean() -> None:
    assert load_settings({"SUPPRESSION_ENABLED": "t"}).suppression_enabled is True


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"SMTP_MAX_SEND_RATE": "-1"}, "SMTP_MAX_SEND_RATE"),
        ({"SMTP_MAX_SEND_RATE": "fast"}, "SMTP_MAX_SEND_RATE"),
        ({"IDEMPOTENCY_TTL": "0"}, "IDEMPOTENCY_TTL"),
        ({"SUPPRESSION_ENABLED": "yes"}, "SUPPRESSION_ENABLED"),
    ],
)
def test_issue_11_settings_reject_bad_values(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ)
