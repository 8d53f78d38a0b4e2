"""The one partitioning of every asset: the UTC arrival day ``yyyy/mm/dd`` (SPEC §4)."""


from datetime import UTC, datetime

import dagster as dg

PARTITION_FMT = "%Y/%m/%d"

#: end_offset=1 so today's partition exists: files arriving today are processed today.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date="2020/01/01", fmt=PARTITION_FMT, timezone="UTC", end_offset=1
)


def today_key(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime(PARTITION_FMT)
