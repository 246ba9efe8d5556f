/**
 * Histo-UNet: export image tiles and label tiles from QuPath annotations (step 01, QuPath route).
 *
 * Purpose
 *   Writes, for the current image, fixed-size RGB tiles and matching label tiles made
 *   from the classified annotations, for training the U-Net. Same files as the Python
 *   route (notebooks/01_export_tiles.ipynb), so later notebooks read either one.
 *
 * Requirements
 *   QuPath 0.5 (tested against the 0.5 scripting API: LabeledImageServer.Builder and
 *   TileExporter; 0.4 and 0.6 have the same calls). A project whose images have a pixel
 *   size in um, and annotations classified with the class names of data/classes.yaml.
 *
 * Inputs
 *   The current image of the project and its annotations. Unclassified annotations and
 *   classes not listed in CLASS_LABELS below are ignored (they stay 0 = unlabelled).
 *
 * Outputs  (in PROJECT_BASE_DIR/tiles/, one flat folder for all images)
 *   '<image> [d=D,x=X,y=Y,w=W,h=H].png'            RGB tile
 *   '<image> [d=D,x=X,y=Y,w=W,h=H]-labelled.png'   uint8 labels: 0 unlabelled, 1..N classes
 *   x, y, w, h in full-resolution pixels, D = level-0 pixels per tile pixel.
 *   Copy (or point) the folder to <workdir>/tiles, or give it to notebook 01 as
 *   qupath_tiles=...; helpers.tiles.read_tile_folder rebuilds the manifest from the names.
 *
 * How to run
 *   In QuPath: Automate > Script editor > open this file > Run (or "Run for project").
 *   Headless:  QuPath script -p project.qpproj -s groovy/export_tiles.groovy
 *              (runs once per image of the project).
 *
 * Overlaps: LabeledImageServer paints class by class in the order the labels are added,
 * so where annotations of different classes overlap the class added last wins. DRAW_ORDER
 * below puts Tumor last, so tumour nests outlined inside a Stroma region keep their label.
 * (The Python route puts the smaller annotation on top, which agrees for nests drawn
 * inside larger regions.)
 */

import qupath.lib.common.ColorTools
import qupath.lib.images.servers.LabeledImageServer
import qupath.lib.images.writers.TileExporter

// ===================== USER SETTINGS =====================
// Keep these identical to data/classes.yaml and to the Python route's parameters.
double requestedPixelSize = 1.0   // um per tile pixel (Python route: mpp)
int tileSize = 256                // tile side in pixels (Python route: tile_size)
int overlap = 0                   // pixels shared by neighbouring tiles (Python route: tile_size - stride)
String outputFolder = 'tiles'     // sub-folder of the project folder
// QuPath class name -> label value (data/classes.yaml); 0 is reserved for unlabelled.
def CLASS_LABELS = [
    'Background': 1,
    'Tumor'     : 2,
    'Stroma'    : 3,
    'Other'     : 4,
]
// Where classes overlap, the class drawn last wins: put small, important classes last.
def DRAW_ORDER = ['Background', 'Other', 'Stroma', 'Tumor']
// =================== END USER SETTINGS ===================

def imageData = getCurrentImageData()
if (imageData == null) {
    println 'ERROR: no image is open; open an image or run this script for the project'
    return
}
def server = imageData.getServer()
def cal = server.getPixelCalibration()
if (!cal.hasPixelSizeMicrons()) {
    println "ERROR: ${server.getMetadata().getName()} has no pixel size in um; set it in Image > Pixel size, then rerun"
    return
}
double downsample = requestedPixelSize / cal.getAveragedPixelSize().doubleValue()
if (DRAW_ORDER.toSet() != CLASS_LABELS.keySet()) {
    println "ERROR: DRAW_ORDER ${DRAW_ORDER} must list exactly the classes of CLASS_LABELS ${CLASS_LABELS.keySet()}"
    return
}

def known = getAnnotationObjects().findAll { it.getPathClass() != null }*.getPathClass()*.toString().unique()
def unknown = known.findAll { !CLASS_LABELS.containsKey(it) }
if (!unknown.isEmpty()) {
    println "WARNING: classes ${unknown} are not in CLASS_LABELS ${CLASS_LABELS.keySet()}; they stay unlabelled"
}

def labelBuilder = new LabeledImageServer.Builder(imageData)
    .backgroundLabel(0, ColorTools.BLACK)   // unannotated pixels = 0 = unlabelled
    .downsample(downsample)
    .multichannelOutput(false)              // one label image with values 0..N
DRAW_ORDER.each { className -> labelBuilder.addLabel(className, CLASS_LABELS[className] as int) }
def labelServer = labelBuilder.build()

def pathOutput = buildFilePath(PROJECT_BASE_DIR, outputFolder)
mkdirs(pathOutput)

// Same image and label extension: TileExporter names label tiles '<stem>-labelled.png'.
new TileExporter(imageData)
    .downsample(downsample)
    .imageExtension('.png')
    .labeledImageExtension('.png')
    .tileSize(tileSize)
    .overlap(overlap)
    .labeledServer(labelServer)
    .annotatedTilesOnly(true)
    .writeTiles(pathOutput)

println "Exported tiles of ${server.getMetadata().getName()} at ${requestedPixelSize} um/px (downsample ${downsample}) to ${pathOutput}"
