//! The libibverbs structures declared by hand in `src/rdma/verbs.rs`, checked field by field
//! against rdma-core's own headers: a C program compiled with them prints every size and
//! offset, and each must equal the Rust declaration's.
//!
//! The headers come from Debian's libibverbs-dev, which `scripts/test` downloads (never
//! installs) into the lab cache and names in `PVRDMA_IBVERBS_INCLUDE`. Without it the test
//! says so loudly; under CI (`CI` set) that is a failure.

use std::mem::{align_of, offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use pvrdma_backend::rdma::abi::*;

/// `(C expression, Rust value)` for every size and offset the Rust side relies on.
fn expected() -> Vec<(&'static str, usize)> {
    macro_rules! field {
        ($c:literal, $rust:ty, $field:ident) => {
            (
                concat!("offsetof(struct ", $c, ", ", stringify!($field), ")"),
                offset_of!($rust, $field),
            )
        };
    }
    macro_rules! renamed {
        ($c:literal, $c_field:literal, $rust:ty, $field:ident) => {
            (
                concat!("offsetof(struct ", $c, ", ", $c_field, ")"),
                offset_of!($rust, $field),
            )
        };
    }
    vec![
        ("sizeof(union ibv_gid)", size_of::<IbvGid>()),
        ("sizeof(struct ibv_async_event)", size_of::<IbvAsyncEvent>()),
        field!("ibv_async_event", IbvAsyncEvent, element),
        field!("ibv_async_event", IbvAsyncEvent, event_type),
        ("_Alignof(union ibv_gid)", align_of::<IbvGid>()),
        // The compat prefix ends with `flags`; the structure is 4-byte aligned.
        (
            "(offsetof(struct ibv_port_attr, flags) + 1 + 3) / 4 * 4",
            size_of::<IbvPortAttr>(),
        ),
        field!("ibv_port_attr", IbvPortAttr, state),
        field!("ibv_port_attr", IbvPortAttr, max_mtu),
        field!("ibv_port_attr", IbvPortAttr, active_mtu),
        field!("ibv_port_attr", IbvPortAttr, gid_tbl_len),
        field!("ibv_port_attr", IbvPortAttr, port_cap_flags),
        field!("ibv_port_attr", IbvPortAttr, max_msg_sz),
        field!("ibv_port_attr", IbvPortAttr, pkey_tbl_len),
        field!("ibv_port_attr", IbvPortAttr, lid),
        field!("ibv_port_attr", IbvPortAttr, lmc),
        field!("ibv_port_attr", IbvPortAttr, active_width),
        field!("ibv_port_attr", IbvPortAttr, phys_state),
        field!("ibv_port_attr", IbvPortAttr, link_layer),
        field!("ibv_port_attr", IbvPortAttr, flags),
        ("sizeof(struct ibv_gid_entry)", size_of::<IbvGidEntry>()),
        field!("ibv_gid_entry", IbvGidEntry, gid),
        field!("ibv_gid_entry", IbvGidEntry, gid_index),
        field!("ibv_gid_entry", IbvGidEntry, port_num),
        field!("ibv_gid_entry", IbvGidEntry, gid_type),
        field!("ibv_gid_entry", IbvGidEntry, ndev_ifindex),
        ("sizeof(struct ibv_context_ops)", size_of::<IbvContextOps>()),
        field!("ibv_context_ops", IbvContextOps, alloc_mw),
        field!("ibv_context_ops", IbvContextOps, poll_cq),
        field!("ibv_context_ops", IbvContextOps, req_notify_cq),
        field!("ibv_context_ops", IbvContextOps, post_srq_recv),
        field!("ibv_context_ops", IbvContextOps, post_send),
        field!("ibv_context_ops", IbvContextOps, post_recv),
        renamed!(
            "ibv_context_ops",
            "_compat_async_event",
            IbvContextOps,
            compat_async_event
        ),
        field!("ibv_context", IbvContext, device),
        field!("ibv_context", IbvContext, ops),
        field!("ibv_context", IbvContext, cmd_fd),
        field!("ibv_context", IbvContext, async_fd),
        field!("ibv_context", IbvContext, num_comp_vectors),
        ("sizeof(struct ibv_pd)", size_of::<IbvPd>()),
        field!("ibv_pd", IbvPd, handle),
        ("sizeof(struct ibv_mr)", size_of::<IbvMr>()),
        field!("ibv_mr", IbvMr, pd),
        field!("ibv_mr", IbvMr, addr),
        field!("ibv_mr", IbvMr, length),
        field!("ibv_mr", IbvMr, handle),
        field!("ibv_mr", IbvMr, lkey),
        field!("ibv_mr", IbvMr, rkey),
        (
            "sizeof(struct ibv_comp_channel)",
            size_of::<IbvCompChannel>(),
        ),
        field!("ibv_comp_channel", IbvCompChannel, fd),
        field!("ibv_cq", IbvCq, channel),
        field!("ibv_cq", IbvCq, cq_context),
        field!("ibv_cq", IbvCq, handle),
        field!("ibv_cq", IbvCq, cqe),
        field!("ibv_qp", IbvQp, pd),
        field!("ibv_qp", IbvQp, send_cq),
        field!("ibv_qp", IbvQp, recv_cq),
        field!("ibv_qp", IbvQp, srq),
        field!("ibv_qp", IbvQp, handle),
        field!("ibv_qp", IbvQp, qp_num),
        field!("ibv_qp", IbvQp, state),
        field!("ibv_qp", IbvQp, qp_type),
        ("sizeof(struct ibv_qp_cap)", size_of::<IbvQpCap>()),
        field!("ibv_qp_cap", IbvQpCap, max_inline_data),
        (
            "sizeof(struct ibv_qp_init_attr)",
            size_of::<IbvQpInitAttr>(),
        ),
        field!("ibv_qp_init_attr", IbvQpInitAttr, send_cq),
        field!("ibv_qp_init_attr", IbvQpInitAttr, recv_cq),
        field!("ibv_qp_init_attr", IbvQpInitAttr, srq),
        field!("ibv_qp_init_attr", IbvQpInitAttr, cap),
        field!("ibv_qp_init_attr", IbvQpInitAttr, qp_type),
        field!("ibv_qp_init_attr", IbvQpInitAttr, sq_sig_all),
        (
            "sizeof(struct ibv_global_route)",
            size_of::<IbvGlobalRoute>(),
        ),
        field!("ibv_global_route", IbvGlobalRoute, flow_label),
        field!("ibv_global_route", IbvGlobalRoute, sgid_index),
        field!("ibv_global_route", IbvGlobalRoute, hop_limit),
        field!("ibv_global_route", IbvGlobalRoute, traffic_class),
        ("sizeof(struct ibv_ah_attr)", size_of::<IbvAhAttr>()),
        field!("ibv_ah_attr", IbvAhAttr, dlid),
        field!("ibv_ah_attr", IbvAhAttr, sl),
        field!("ibv_ah_attr", IbvAhAttr, is_global),
        field!("ibv_ah_attr", IbvAhAttr, port_num),
        ("sizeof(struct ibv_qp_attr)", size_of::<IbvQpAttr>()),
        field!("ibv_qp_attr", IbvQpAttr, path_mtu),
        field!("ibv_qp_attr", IbvQpAttr, qkey),
        field!("ibv_qp_attr", IbvQpAttr, rq_psn),
        field!("ibv_qp_attr", IbvQpAttr, sq_psn),
        field!("ibv_qp_attr", IbvQpAttr, dest_qp_num),
        field!("ibv_qp_attr", IbvQpAttr, qp_access_flags),
        field!("ibv_qp_attr", IbvQpAttr, cap),
        field!("ibv_qp_attr", IbvQpAttr, ah_attr),
        field!("ibv_qp_attr", IbvQpAttr, alt_ah_attr),
        field!("ibv_qp_attr", IbvQpAttr, pkey_index),
        field!("ibv_qp_attr", IbvQpAttr, max_rd_atomic),
        field!("ibv_qp_attr", IbvQpAttr, max_dest_rd_atomic),
        field!("ibv_qp_attr", IbvQpAttr, min_rnr_timer),
        field!("ibv_qp_attr", IbvQpAttr, port_num),
        field!("ibv_qp_attr", IbvQpAttr, timeout),
        field!("ibv_qp_attr", IbvQpAttr, retry_cnt),
        field!("ibv_qp_attr", IbvQpAttr, rnr_retry),
        field!("ibv_qp_attr", IbvQpAttr, alt_timeout),
        field!("ibv_qp_attr", IbvQpAttr, rate_limit),
        ("sizeof(struct ibv_sge)", size_of::<IbvSge>()),
        field!("ibv_sge", IbvSge, length),
        field!("ibv_sge", IbvSge, lkey),
        ("sizeof(struct ibv_send_wr)", size_of::<IbvSendWr>()),
        field!("ibv_send_wr", IbvSendWr, next),
        field!("ibv_send_wr", IbvSendWr, sg_list),
        field!("ibv_send_wr", IbvSendWr, num_sge),
        field!("ibv_send_wr", IbvSendWr, opcode),
        field!("ibv_send_wr", IbvSendWr, send_flags),
        field!("ibv_send_wr", IbvSendWr, imm_data),
        field!("ibv_send_wr", IbvSendWr, wr),
        field!("ibv_send_wr", IbvSendWr, qp_type),
        renamed!("ibv_send_wr", "bind_mw", IbvSendWr, bind_mw_or_tso),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.rkey) - offsetof(struct ibv_send_wr, wr)",
            offset_of!(IbvSendWrRemote, compare_add),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.atomic.swap) - offsetof(struct ibv_send_wr, wr)",
            offset_of!(IbvSendWrRemote, swap),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.atomic.rkey) - offsetof(struct ibv_send_wr, wr)",
            offset_of!(IbvSendWrRemote, rkey),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.ud.remote_qpn) - offsetof(struct ibv_send_wr, wr)",
            offset_of!(IbvSendWrRemote, compare_add),
        ),
        ("sizeof(struct ibv_recv_wr)", size_of::<IbvRecvWr>()),
        field!("ibv_recv_wr", IbvRecvWr, next),
        field!("ibv_recv_wr", IbvRecvWr, sg_list),
        field!("ibv_recv_wr", IbvRecvWr, num_sge),
        ("sizeof(struct ibv_wc)", size_of::<IbvWc>()),
        field!("ibv_wc", IbvWc, status),
        field!("ibv_wc", IbvWc, opcode),
        field!("ibv_wc", IbvWc, vendor_err),
        field!("ibv_wc", IbvWc, byte_len),
        field!("ibv_wc", IbvWc, imm_data),
        field!("ibv_wc", IbvWc, qp_num),
        field!("ibv_wc", IbvWc, src_qp),
        field!("ibv_wc", IbvWc, wc_flags),
        field!("ibv_wc", IbvWc, pkey_index),
        field!("ibv_wc", IbvWc, sl),
        field!("ibv_wc", IbvWc, dlid_path_bits),
        ("IBV_QPT_RC", QPT_RC as usize),
        ("IBV_QPT_UD", QPT_UD as usize),
        ("IBV_QPS_RESET", QPS_RESET as usize),
        ("IBV_QPS_INIT", QPS_INIT as usize),
        ("IBV_QPS_RTR", QPS_RTR as usize),
        ("IBV_QPS_RTS", QPS_RTS as usize),
        ("IBV_QPS_ERR", QPS_ERR as usize),
        ("IBV_QP_STATE", QP_STATE as usize),
        ("IBV_QP_ACCESS_FLAGS", QP_ACCESS_FLAGS as usize),
        ("IBV_QP_PKEY_INDEX", QP_PKEY_INDEX as usize),
        ("IBV_QP_PORT", QP_PORT as usize),
        ("IBV_QP_QKEY", QP_QKEY as usize),
        ("IBV_QP_AV", QP_AV as usize),
        ("IBV_QP_PATH_MTU", QP_PATH_MTU as usize),
        ("IBV_QP_TIMEOUT", QP_TIMEOUT as usize),
        ("IBV_QP_RETRY_CNT", QP_RETRY_CNT as usize),
        ("IBV_QP_RNR_RETRY", QP_RNR_RETRY as usize),
        ("IBV_QP_RQ_PSN", QP_RQ_PSN as usize),
        ("IBV_QP_MAX_QP_RD_ATOMIC", QP_MAX_QP_RD_ATOMIC as usize),
        ("IBV_QP_MIN_RNR_TIMER", QP_MIN_RNR_TIMER as usize),
        ("IBV_QP_SQ_PSN", QP_SQ_PSN as usize),
        ("IBV_QP_MAX_DEST_RD_ATOMIC", QP_MAX_DEST_RD_ATOMIC as usize),
        ("IBV_QP_DEST_QPN", QP_DEST_QPN as usize),
        ("IBV_ACCESS_LOCAL_WRITE", ACCESS_LOCAL_WRITE as usize),
        ("IBV_ACCESS_REMOTE_WRITE", ACCESS_REMOTE_WRITE as usize),
        ("IBV_ACCESS_REMOTE_READ", ACCESS_REMOTE_READ as usize),
        ("IBV_ACCESS_REMOTE_ATOMIC", ACCESS_REMOTE_ATOMIC as usize),
        ("IBV_WR_RDMA_WRITE", WR_RDMA_WRITE as usize),
        (
            "IBV_WR_RDMA_WRITE_WITH_IMM",
            WR_RDMA_WRITE_WITH_IMM as usize,
        ),
        ("IBV_WR_SEND", WR_SEND as usize),
        ("IBV_WR_SEND_WITH_IMM", WR_SEND_WITH_IMM as usize),
        ("IBV_WR_RDMA_READ", WR_RDMA_READ as usize),
        ("IBV_WR_ATOMIC_CMP_AND_SWP", WR_ATOMIC_CMP_AND_SWP as usize),
        (
            "IBV_WR_ATOMIC_FETCH_AND_ADD",
            WR_ATOMIC_FETCH_AND_ADD as usize,
        ),
        ("IBV_SEND_SIGNALED", SEND_SIGNALED as usize),
        ("IBV_SEND_SOLICITED", SEND_SOLICITED as usize),
        ("IBV_EVENT_QP_FATAL", EVENT_QP_FATAL as usize),
        ("IBV_EVENT_QP_REQ_ERR", EVENT_QP_REQ_ERR as usize),
        ("IBV_EVENT_QP_ACCESS_ERR", EVENT_QP_ACCESS_ERR as usize),
        ("IBV_EVENT_DEVICE_FATAL", EVENT_DEVICE_FATAL as usize),
        ("IBV_EVENT_PORT_ERR", EVENT_PORT_ERR as usize),
        ("IBV_WC_SUCCESS", WC_SUCCESS as usize),
        ("IBV_WC_LOC_LEN_ERR", WC_LOC_LEN_ERR as usize),
        ("IBV_WC_LOC_PROT_ERR", WC_LOC_PROT_ERR as usize),
        ("IBV_WC_WR_FLUSH_ERR", WC_WR_FLUSH_ERR as usize),
        ("IBV_WC_REM_INV_REQ_ERR", WC_REM_INV_REQ_ERR as usize),
        ("IBV_WC_REM_ACCESS_ERR", WC_REM_ACCESS_ERR as usize),
        ("IBV_WC_REM_OP_ERR", WC_REM_OP_ERR as usize),
        ("IBV_WC_RETRY_EXC_ERR", WC_RETRY_EXC_ERR as usize),
        ("IBV_WC_RNR_RETRY_EXC_ERR", WC_RNR_RETRY_EXC_ERR as usize),
        ("IBV_WC_RECV_RDMA_WITH_IMM", WC_RECV_RDMA_WITH_IMM as usize),
        ("IBV_WC_WITH_IMM", WC_WITH_IMM as usize),
        ("IBV_WC_SEND", WC_SEND as usize),
        ("IBV_WC_RECV", WC_RECV as usize),
        ("IBV_PORT_ACTIVE", PORT_ACTIVE as usize),
        ("IBV_LINK_LAYER_ETHERNET", LINK_LAYER_ETHERNET as usize),
        ("IBV_LINK_LAYER_INFINIBAND", LINK_LAYER_INFINIBAND as usize),
        ("IBV_GID_TYPE_ROCE_V2", GID_TYPE_ROCE_V2 as usize),
    ]
}

#[test]
fn declared_structures_match_rdma_cores_headers() {
    let Some(include) = std::env::var_os("PVRDMA_IBVERBS_INCLUDE").map(PathBuf::from) else {
        let message = "NOT CHECKED: the libibverbs ABI declarations were not compared with \
                       rdma-core's headers (PVRDMA_IBVERBS_INCLUDE is unset; scripts/test \
                       downloads them)";
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("{message}");
        return;
    };
    assert!(
        include.join("infiniband/verbs.h").is_file(),
        "no infiniband/verbs.h under {}",
        include.display()
    );
    let checks = expected();
    let mut program = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <infiniband/verbs.h>\nint main(void) {\n",
    );
    for (expression, _) in &checks {
        program.push_str(&format!(
            "    printf(\"%zu\\n\", (size_t)({expression}));\n"
        ));
    }
    program.push_str("    return 0;\n}\n");
    let dir = std::env::temp_dir().join(format!("pvrdma-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("abi.c");
    let binary = dir.join("abi");
    std::fs::write(&source, program).unwrap();
    let compiled = Command::new("cc")
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .output()
        .expect("a C compiler (cc)");
    assert!(
        compiled.status.success(),
        "the check program did not compile against {}:\n{}",
        include.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    let ran = Command::new(&binary)
        .output()
        .expect("run the check program");
    let _ = std::fs::remove_dir_all(&dir);
    let printed: Vec<usize> = String::from_utf8(ran.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(printed.len(), checks.len());
    let wrong: Vec<String> = checks
        .iter()
        .zip(&printed)
        .filter(|((_, rust), c)| rust != *c)
        .map(|((expression, rust), c)| format!("{expression}: C says {c}, Rust says {rust}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    eprintln!(
        "{} sizes, offsets and constants match rdma-core's headers in {}",
        checks.len(),
        include.display()
    );
}
