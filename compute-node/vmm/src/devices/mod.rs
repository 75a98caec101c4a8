//! Emulated devices and the dispatch of vCPU port and MMIO exits to them:
//! the serial UART, the fixed legacy ports, PCI bus 0 and its virtio-pci
//! devices (one folder each under `virtio/`), and interrupt delivery.

pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use legacy::{LegacyDevices, MachineRequest};
use pci::PciBus;
use serial::{SERIAL_PORT, SerialDevice};

/// UART register for byte `i` of an access at `port`.
fn serial_offset(port: u16, i: usize) -> u8 {
    let reg = usize::from(port - SERIAL_PORT) + i;
    u8::try_from(reg & 7).unwrap_or(0)
}

/// Every device a vCPU exit can reach.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Power, reset, power button.
    pub legacy: Arc<LegacyDevices>,
    /// PCI bus 0.
    pub pci: Arc<PciBus>,
}

impl Devices {
    /// A port read; unclaimed ports read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            for (i, b) in data.iter_mut().enumerate() {
                *b = s.read(serial_offset(port, i));
            }
        } else if PciBus::handles(port) {
            self.pci.pio_read(port, data);
        } else if LegacyDevices::handles(port) {
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = self.legacy.read(port);
            }
        } else {
            data.fill(0xff);
        }
    }

    /// A port write, and whether it asks for poweroff or reset.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> MachineRequest {
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            for (i, b) in data.iter().enumerate() {
                s.write(serial_offset(port, i), *b);
            }
            MachineRequest::None
        } else if PciBus::handles(port) {
            self.pci.pio_write(port, data);
            MachineRequest::None
        } else if LegacyDevices::handles(port) {
            data.first()
                .map_or(MachineRequest::None, |b| self.legacy.write(port, *b))
        } else {
            MachineRequest::None
        }
    }

    /// An MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    /// An MMIO write; unclaimed addresses ignore it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.pci.mmio_write(addr, data);
    }
}
