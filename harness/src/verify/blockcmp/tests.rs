use super::*;

fn cmp(identical: bool, first: Option<u64>, size: (u64, u64)) -> BlockComparison {
    BlockComparison {
        identical,
        first_difference: first,
        size,
        bytes_compared: 12 << 20,
        bytes_skipped: 1012 << 20,
        names: ("data.qcow2".into(), "restored.qcow2".into()),
        cluster_size: Some(65536),
    }
}

#[test]
fn display_says_what_a_report_needs() {
    assert_eq!(
        cmp(true, None, (1 << 30, 1 << 30)).to_string(),
        "identical: 12 MiB of data compared, 1012 MiB zero in both"
    );
    assert_eq!(
        cmp(false, Some(0x12345), (1 << 30, 1 << 30)).to_string(),
        "differ at byte 74565 (cluster 0x10000 of 'data.qcow2', 64 KiB clusters)"
    );
    assert_eq!(
        cmp(false, Some(100), (200, 100)).to_string(),
        "sizes differ: 'data.qcow2' is 200 bytes, 'restored.qcow2' is 100 bytes; the first 100 bytes are identical"
    );
    assert_eq!(
        cmp(false, Some(10), (200, 100)).to_string(),
        "sizes differ: 'data.qcow2' is 200 bytes, 'restored.qcow2' is 100 bytes; differ at byte 10 \
         (cluster 0x0 of 'data.qcow2', 64 KiB clusters)"
    );
}

#[test]
fn human_sizes() {
    assert_eq!(human(512), "512 bytes");
    assert_eq!(human(1536), "1.5 KiB");
    assert_eq!(human(1 << 30), "1 GiB");
}
