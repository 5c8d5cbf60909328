//! Privileged ABI contract: the embedded eBPF object, loaded by aya, has every map
//! named in `lb-common` with exactly the key/value sizes and capacities declared
//! there, and every program with the expected type.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::{
    maps::{Map, MapData},
    programs::Program,
};
use lb_common::{MAP_LAYOUT, PROG_SK_MSG, PROG_SK_SKB, PROG_SOCKOPS, PROG_XDP, PROGRAMS};
use testkit::{PinDir, privileged};

fn data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::PerCpuArray(m)
        | Map::SockHash(m)
        | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

#[test]
fn every_map_and_program_matches_lb_common() -> Result<()> {
    if !privileged("every_map_and_program_matches_lb_common") {
        return Ok(());
    }
    let pins = PinDir::new();
    // Mounts bpffs at /sys/fs/bpf first if nothing is mounted there (as agentlb does).
    agentlb::dataplane::pins::prepare_dir(pins.path(), true)?;
    let ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(pins.path())
        .load(agentlb::dataplane::kernel::object())?;

    let maps: BTreeMap<&str, &Map> = ebpf.maps().collect();
    for (name, key, value, max) in MAP_LAYOUT {
        let map = maps
            .get(name)
            .with_context(|| format!("map {name} missing from the object"))?;
        let info = data(map)
            .with_context(|| format!("map {name} has an unexpected type"))?
            .info()?;
        assert_eq!(
            (info.key_size(), info.value_size(), info.max_entries()),
            (key, value, max),
            "map {name}: (key, value, max_entries) differ from lb-common"
        );
        assert_eq!(info.name_as_str(), Some(name), "kernel map name");
    }
    assert!(maps.contains_key("AYA_LOGS"), "aya-log ring buffer missing");
    assert!(matches!(
        maps.get(lb_common::MAP_SOCKS),
        Some(Map::SockHash(_))
    ));
    assert!(matches!(
        maps.get(lb_common::MAP_COUNTERS),
        Some(Map::PerCpuArray(_))
    ));

    for name in PROGRAMS {
        let p = ebpf
            .program(name)
            .with_context(|| format!("program {name} missing"))?;
        let ok = match name {
            PROG_SOCKOPS => matches!(p, Program::SockOps(_)),
            PROG_SK_SKB => matches!(p, Program::SkSkb(_)),
            PROG_SK_MSG => matches!(p, Program::SkMsg(_)),
            PROG_XDP => matches!(p, Program::Xdp(_)),
            _ => false,
        };
        assert!(ok, "program {name} has the wrong type");
    }
    // Only the maps lb-common calls persistent were pinned.
    assert_eq!(pins.entries(), ["ALB_BACKENDS", "ALB_META"]);
    Ok(())
}
